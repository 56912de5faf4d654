"""Recipes: the stages a person runs (pretrain, finetune, curves, pipelines, the demo).

They use the library; the library never imports them (tests/test_layout.py checks that).
"""
