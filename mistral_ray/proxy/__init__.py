"""What we add to Ray's HTTP proxy (HAProxy): the stream guard and OpenAI-shaped error files."""
