"""LoRA on INT8 models (ComfyUI glue; imports ``ops``).

``merge``    patches through ComfyUI's patcher: dequantize, apply the whole stack in float with
             core's ``calculate_weight`` (LoRA, LoCon, LoHa, LoKr, DoRA), requantize once with
             seeded stochastic rounding onto per-row scales; unpatching restores the INT8 weights
             bit-exactly (ComfyUI keeps the original QuantizedTensor as its backup).
``dynamic``  the INT8 weights stay as they are; each affected layer gets a low-rank term per model
             clone (an object patch), fused into the INT8 GEMM's epilogue.
``preload``  LoRAs applied to float weights before they are first quantized (the loader's LoRA input).
``loading``  reading LoRA files and matching their keys (BFL/ComfyUI, diffusers/PEFT, kohya) to a model.
"""
