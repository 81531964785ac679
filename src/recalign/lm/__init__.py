"""Language-model layer: loading (embedded SmolLM2, any HF causal LM, tiny test models), prompts, scoring."""
