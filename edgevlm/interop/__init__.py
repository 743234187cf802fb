"""Interoperability: edgevlm files in other runtimes' formats. Nothing here is imported by the runtime.

``onnx_pack`` / ``onnx_graph`` / ``onnx_export``: ``edgevlm export-onnx``, ONNX graphs whose packed
weights run as ONNX Runtime's ``com.microsoft.MatMulNBits`` (``onnx`` imported inside functions;
no torch). Other modules of this package convert to Hugging Face checkpoint layouts.
"""
