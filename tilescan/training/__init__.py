"""Training and evaluation: image folders, training, metrics, and a user's own legend (labels, chips, splits, transfer).
"""
