"""`mp2a bench …`: figures as one JSON object, measured side by side in one run."""
