#!/usr/bin/env python
"""Predict entry point; the implementation lives in vision_lstm.cli."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))  # run from a checkout too

from vision_lstm.cli import predict_main  # noqa: E402

if __name__ == "__main__":
    predict_main()
