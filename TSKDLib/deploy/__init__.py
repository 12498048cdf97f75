"""Stage 4: the exported model package (ONNX + model card, checksums) and torch-free inference with onnxruntime."""
