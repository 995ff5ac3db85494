"""Deployable formats of a trained model: conversion (ONNX fp16/int8, OpenVINO fp32/int8 via NNCF, NCNN
via pnnx), int8 calibration on LR patches of the training data, a runner per format, and verification
of every format against the fp32 PyTorch model (`run_quantize`, the job's `quantizing` stage)."""
