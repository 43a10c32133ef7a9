"""`python -m cli`: the ollama-gw command without its console script (child processes)."""
from cli import main

main()
