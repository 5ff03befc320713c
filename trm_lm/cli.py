"""What every command line of the project shares."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or the help text already says what the default is (argparse's
    own formatter would print "(default: the model's) (default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)
