"""Certified defense of a query-only classifier: denoised smoothing trained by ZO, certified by randomized smoothing.

A denoiser D is trained in front of a classifier f that can only be queried (FO-DS as the white-box
upper bound, ZO-AE-DS in an autoencoder's latent, ZO-DS by sparse CGE on D itself, DeepZero), then
g(x) = argmax_c P[f(D(x + ε)) = c] is certified by CERTIFY/PREDICT (Cohen et al. 2019).
"""
