"""medvlm train."""
