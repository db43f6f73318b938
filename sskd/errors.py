"""The one error type a user sees: a single line that names the file, sample or field at fault."""


class SSKDError(Exception):
    """Bad input or an unusable artefact (shard, cache, checkpoint, config).

    The CLI prints ``sskd: error: <message>`` on one line and exits with status 2; library callers can
    catch it. The message must name what is wrong and where (a path, a sample key, a config field).
    """
