"""Evaluation: quality metrics against the un-accelerated baseline, and report writers.

Submodules: ``metrics`` (PSNR, SSIM, LPIPS, text agreement) and ``report`` (JSON, Markdown and
HTML reports). Import them directly; this package imports nothing heavy on its own.
"""
