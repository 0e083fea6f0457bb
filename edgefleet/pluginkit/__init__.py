"""Helpers for plugin authors: the pieces that several built-in plugins need alike.

Plugins run in a sandboxed child process that can import `edgefleet` but
cannot import one another (each is its own package, `edgefleet_plugins.<name>`),
so logic two plugins share has to live here rather than in either plugin.
Everything in this package is standard library only, because the sandbox
child must be able to import it without the plugin's extra dependencies.

* `actions`: the `run(ctx, action, args)` dispatcher, argument checks, stopping on cancel;
* `proc`: running a command in its own process group with a timeout and cancellation;
* `archive`: opening and safely unpacking the tar files that steps hand on;
* `files`: reading a JSON manifest that an earlier step wrote;
* `text`: sentence splitting, stop words and the text-block file format;
* `models`: getting a model through `ctx.model(task)` and reading its answer, with a fallback.

Each plugin keeps its own logic; only what is the same across plugins belongs here.
"""
