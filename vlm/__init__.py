"""medvlm vlm."""
