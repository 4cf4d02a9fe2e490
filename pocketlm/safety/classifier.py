"""The classifier backend: alt-profanity-check (a linear SVM over character and word n-grams trained
on offensive-language data, shipped inside the package, so it runs offline in well under a
millisecond a message). It gives one probability, that the text is offensive or abusive, which we
report as OpenAI's "harassment" score; it knows nothing of the other categories, so they stay 0."""

from __future__ import annotations

import warnings

from pocketlm.safety.categories import ModerationError, Verdict


class ClassifierBackend:
    name = "alt-profanity-check"

    def __init__(self, threshold: float = 0.5):
        try:
            with warnings.catch_warnings():  # scikit-learn warns when the pickled model's version differs
                warnings.simplefilter("ignore")
                from profanity_check import predict_prob
        except ImportError:
            raise ModerationError("the 'classifier' moderation backend needs the alt-profanity-check package "
                                  "(pip install alt-profanity-check)") from None
        self._predict, self.threshold = predict_prob, threshold

    def check_many(self, texts: list[str]) -> list[Verdict]:
        out = []
        for p in self._predict(list(texts)):
            v = Verdict.empty(self.threshold)
            v.raise_score("harassment", float(p))
            out.append(v)
        return out

    def check(self, text: str) -> Verdict:
        return self.check_many([text])[0]
