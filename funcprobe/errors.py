"""Named exceptions. Each subclasses the built-in a caller would catch without funcprobe.

Callers that need to tell "this batch carries nothing to predict" from "the probe is
mis-set" catch the specific class (the TRL integration catches only ``NoSignalError``
as a reason to skip a step quietly); everything else stays catchable as before
(``ValueError``, ``RuntimeError``, ...).
"""

from __future__ import annotations


class SettingsError(ValueError):
    """A setting or argument has a wrong type or value; the message names it."""


class NoSignalError(ValueError):
    """The update batch carries no policy-gradient signal (e.g. every advantage is 0),
    so there is no step to probe. Raised on every data-parallel rank together."""


class UnreachableDirectionError(RuntimeError):
    """Every probe scalar is exactly 0: the direction does not reach the forward (the
    probed parameters are unused, or the adapter is disabled)."""


class NonFiniteError(RuntimeError):
    """NaN or inf where the probe needs finite numbers; the message lists where."""


class RankMismatchError(RuntimeError):
    """Data-parallel ranks disagree on the parameter registry or the settings."""


class ProbeRankError(RuntimeError):
    """The probe failed on one or more data-parallel ranks after its collectives had started.

    Attributes:
        ranks: the ranks (in the probe's process group) whose probe failed, ascending.
        causes: rank → ``"ExceptionType: message"`` of each failing rank's own error.
        agreed: True when every rank raised this error at the same agreement point, so no
            collective of the probe is left pending and training can go on (the TRL
            integration skips the probe then); False when the ranks could not agree (a
            collective failed, or a rank failed after a collective of an FSDP2 model, e.g.
            inside its forward): the process group can no longer be trusted, stop the job.
    """

    def __init__(self, message: str, *, ranks: tuple[int, ...] = (), causes: dict[int, str] | None = None,
                 agreed: bool = True) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)
        self.causes = dict(causes or {})
        self.agreed = bool(agreed)

    def __reduce__(self):  # picklable across processes with its keyword-only fields
        return (_probe_rank_error, (str(self), self.ranks, self.causes, self.agreed))


def _probe_rank_error(message: str, ranks: tuple[int, ...], causes: dict[int, str], agreed: bool) -> ProbeRankError:
    return ProbeRankError(message, ranks=ranks, causes=causes, agreed=agreed)


class UnsupportedModelError(NotImplementedError):
    """A model layout the probe cannot differentiate (FSDP1 flat parameters, DeepSpeed ZeRO-3 partitions)."""


class StaleProbeError(RuntimeError):
    """A long-lived ``EntropyProbe`` found the model's probed parameters changed in a way
    it cannot follow (names or shapes differ from those at construction)."""
