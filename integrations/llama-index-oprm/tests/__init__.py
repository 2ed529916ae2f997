"""Tests for llama-index-oprm (a package, so its conftest does not shadow other test folders' ``conftest``)."""
