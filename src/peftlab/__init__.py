"""peftlab: fine-tune transformer encoders for text classification, full or parameter-efficient.

    import peftlab
    run = peftlab.train("configs/tweets-lora.yaml", data={"n_train": 500})
    classifier = peftlab.load(run.path)
    classifier.predict(["what a lovely day"])

train, study, report and load are in peftlab.api (docs/python.md); they load on first use, so that
`import peftlab` and the command line's --help stay instant.
"""

__version__ = "0.1.0"
__all__ = ["Run", "StudyResult", "load", "report", "study", "train"]


def __getattr__(name: str):
    if name in __all__:
        from peftlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
