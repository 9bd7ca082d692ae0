"""Flow matching (rectified flow / minibatch-OT flow matching) with few-step FID, and a 2-D template.

Pure pieces, importable without Lightning's model code: ``objective`` (interpolant, target, loss,
time sampling), ``samplers`` (Euler, Heun), ``targets2d`` (2-D target distributions) and
``metrics2d`` (exact W2, path straightness).
"""
