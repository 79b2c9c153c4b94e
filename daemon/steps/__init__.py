"""The steps of a deploy, one module each: checkout, build, parse, pytest, push, roll.

Each exposes `async def run(ctx) -> str`, which does its work through an
adapter (blocking calls in a worker thread) and returns a one-line summary,
or raises a DeploydError saying what failed.
"""
