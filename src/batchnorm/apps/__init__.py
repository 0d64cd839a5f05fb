"""The applications built on the public API: the training demo, the walkthrough, the
benchmark (CPU, distributed and tf_keras parts) and the command line that runs them.

Nothing in the library's core imports this package.
"""
