"""The offline demo: with no OPENAI_API_KEY, `make run` and the command line talk to a local fake upstream.

app.py builds the dev app around it. upstream.py is the fake (the tests' and the soak's upstream too),
batches.py its Files and Batch endpoints, answers.py what its answers say: those three need only the
standard library.
"""
