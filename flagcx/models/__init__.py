"""flagcx.models: real models run under flagcx's topology-aware groups (optional extra ``[models]``).

Nothing here is imported by ``import flagcx``: these modules need transformers.
"""
