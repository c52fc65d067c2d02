"""lipforcing.training"""
