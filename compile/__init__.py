"""lipforcing.compile"""
