"""medvlm serve."""
