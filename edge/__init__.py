"""Device-side code: numpy plus LiteRT / ONNX Runtime, nothing heavier.

Never import TensorFlow, Prefect or MLflow here; tests/unit/test_edge_runtime.py proves it.
"""
