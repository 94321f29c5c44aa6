"""Explanations: the batched CAM family, its backend shims, faithfulness scores and the study's figures.
"""
