"""vllm-dspark"""
