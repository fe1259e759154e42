"""Numerics of every rewrite: numpy/scipy only, never imports onnx.

Each function takes weights (and optional statistics) and returns the factors, already in
the ONNX weight layout of the stage they become, plus the relative approximation error.
"""
