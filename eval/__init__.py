"""medvlm eval."""
