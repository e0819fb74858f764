"""Numbers and names shared by every stage: one place for each fact."""

TARGET_TR = 2.0  # seconds; the paper resamples every scan to this repetition time
TARGET_LENGTH = 160  # time points per standardized scan (320 s at TR 2.0 s)
DEFAULT_ATLAS = "schaefer400_tian_s3"
SUBCORTICAL = "Subcortical"
YEO7_NETWORKS = ("Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default")

# Files of the cohort store (see fmrilm.data.cohort).
TIMESERIES_FILE = "timeseries.h5"
TIMESERIES_DATASET = "timeseries"
SCANS_FILE = "scans.parquet"
PHENOTYPES_FILE = "phenotypes.parquet"
ROIS_FILE = "rois.parquet"
META_FILE = "meta.json"
