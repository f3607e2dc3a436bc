"""ONNX exports: writing them (`export`), running them on ONNX Runtime (`runtime`) and the decoder
graph's attention (`attention`)."""
