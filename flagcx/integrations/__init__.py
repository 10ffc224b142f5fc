"""Integrations with inference engines (an application layer above the frontends): nothing here is imported by
``import flagcx``; each engine's entry point imports its own subpackage (``flagcx.integrations.vllm``)."""
