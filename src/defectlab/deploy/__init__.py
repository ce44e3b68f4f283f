"""Deployment: ONNX export, batch inspection, the HTTP service."""
