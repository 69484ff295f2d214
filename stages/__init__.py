"""What gets trained: backbones, stage 1 (valence/arousal), neighborhoods, experts, the flat baseline."""
