"""Models: plain nn.Modules configured by arguments (never by presets), one family per module."""
