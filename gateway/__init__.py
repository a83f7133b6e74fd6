"""GreenRoute's HTTP gateway: OpenAI endpoints, plans, errors, configuration and the CLI."""
