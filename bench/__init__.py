"""lipforcing.bench"""
