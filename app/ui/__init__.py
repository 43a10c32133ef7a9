"""The web dashboard's workings: sign-in sessions, chart series, status tables."""
