"""Edge knowledge distillation: a student designed for a device's storage, speed and deadline,
distilled from a query-only teacher (Hinton KD, cached logits), trained by backprop or forward-only
ZO (MeZO: the memory of inference), with early halting (EarlyLight, Mishra & Gupta) and an ONNX
deployment check."""
