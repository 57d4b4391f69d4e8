"""Commands that compose the library's pipelines (``hwquant demo``)."""
