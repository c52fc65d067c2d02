"""lipforcing.kernels"""
