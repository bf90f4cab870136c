"""Unlearning methods: GA, NPO, qforget and kforget, each one module registered under its `UnlearnMethod`."""
