"""The annotated example configuration printed by ``flybox config example``.

It is kept valid by the tests (it must load with :func:`flybox.config.parse_config`).
"""

from __future__ import annotations

__all__ = ["EXAMPLE_CONFIG"]

EXAMPLE_CONFIG = """\
# flybox configuration (TOML). Check it with: flybox config check FILE
# Sizes and radii are in pixels, pixel sizes in Å, times in seconds.

[session]
name = "krios1-2026-11-21"                       # letters, digits, . _ -
output = "/data/flybox/krios1-2026-11-21"        # OUTPUT folder
# project_dir = "/data/krios1"   # RELION project folder: STAR paths are relative to it
#                                # (default: the working directory at start)
# stall_seconds = 120             # a loop without progress this long: /healthz answers 503

[watch]
micrographs = ["/data/krios1/MotionCorr/**/*.mrc"]           # globs; ** = any folders
coordinates = ["/data/krios1/AutoPick/**/*_autopick.star"]   # paired by micrograph stem
coordinate_suffix = "_autopick.star"
ctf = "/data/krios1/CtfFind/micrographs_ctf.star"  # optional; or a CTFFIND4 *.txt glob
mode = "auto"              # auto (inotify + rescans) | poll (NFS/SMB shares)
rescan_seconds = 30        # reconciliation scan interval
settle_seconds = 1.0       # a file must stop changing this long before it is used
incomplete_timeout_seconds = 120   # an MRC still short of its header this long: quarantined
pairing_timeout_seconds = 600      # report micrographs whose picks/CTF have not come (they wait)

[micrograph]               # optional overrides; leave them out unless the files are wrong
# pixel_size = 0.83        # Å; default: the CTF table's, else the MRC header's
# picking_pixel_size = 3.32  # Å of the coordinates (e.g. picked on binned micrographs);
#                          # coordinates are rescaled when it differs

# The processing chain, in order. Micrograph steps first (dust, phase_flip_micrograph,
# descriptors), then extract, then particle steps; fourier_crop fans out into streams, and
# the steps after it run on every stream.

[[chain]]
step = "dust"              # Xmipp's deterministic dust removal on the whole micrograph
sigma = 5.0

[[chain]]
step = "extract"
box = 384
border = "skip"            # skip | fill (nearest-pixel fill, as RELION)
center_rounding = "trunc"  # trunc (RELION) | round (Xmipp) | floor

[[chain]]
step = "fourier_crop"      # one forward FFT per particle, one output stream per entry
outputs = { particles = 256, particles_small = 64 }

[[chain]]
step = "normalize"         # none | whole | background | ramp
method = "ramp"
bg_radius = 144            # for the extraction box; scaled to each stream as int(R*M/N)
convention = "relion"      # relion | xmipp (σ estimator, background set, ramp mean)

[[chain]]
step = "invert"

# RELION expects unmasked particles normalised to background mean 0, σ 1 (a mask makes the
# background 0 and Class2D warns). To mask anyway, as the last step:
# [[chain]]
# step = "mask"
# shape = "raised_cosine"
# inner = 100              # for the extraction box; scaled to each stream
# outer = 120

[output]
float16 = false            # true: MRC mode 12 with RELION's float16 rules

[executor]
workers = 2                # local worker processes
# address = "tcp://scheduler:8786"   # run on a Dask cluster (pip install 'flybox[dask]'),
#                                    # or "local": `workers` Dask processes here; see
#                                    # docs/scaling.md
drain_seconds = 30         # on SIGTERM, in-flight micrographs get this long to finish
max_attempts = 3           # tries per micrograph when a worker dies or I/O fails
job_timeout_seconds = 600  # per 256 MiB of micrograph: a hung job's worker is replaced

[mqtt]                     # remove this section for no MQTT
host = "127.0.0.1"
port = 1883
# topic_prefix = "flybox/krios1-2026-11-21"   # default: flybox/<session name>
# username = "flybox"
# password = "..."               # never logged
# tls_ca = "/etc/flybox/broker-ca.crt"   # TLS: the broker's CA (port 8883 usually)
# tls_cert = "/etc/flybox/krios1.crt"    # optional client certificate and key
# tls_key = "/etc/flybox/krios1.key"
outbox_limit = 10000       # events kept while the broker is away; past it the oldest go
# flush_seconds = 5.0      # at stop, wait this long for the outbox to drain

[http]
listen = "127.0.0.1:9464"  # /metrics, /api/status, /healthz
# token = "..."            # bearer token for /api/*; required off loopback (e.g. 0.0.0.0:9464)

# Quality rules over the last `window` micrographs: an alert (MQTT PREFIX/events and the
# metric flybox_alert_active{rule}) when at least `count` of them meet `when`. Figures: picks,
# particles, particles.<stream>, excluded_border, local_variance, local_variance_median, gini,
# defocus (Å), border_fraction, latency (s); operators < <= > >=.
[[quality]]
name = "few-particles"
when = "particles < 50"
count = 20
window = 25
"""
