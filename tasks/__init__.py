"""One recipe per `--task`, in the paper's order. Each task file opens with its defaults; `tasks/base.py`
holds the interface they implement (`Task`) and the helpers they share; `tasks/draw.py` their pictures.

    pretrain       §2.2  UniCL pretraining of the two towers (stages 1, 2 and the 384² phase)   tasks/pretrain.py
    detect         §2.4  object-level adapter: Dynamic Head + ATSS, text-aligned classes        tasks/detect.py
    itm_mlm, vqa   §2.5  fine-grained adapter: METER fusion, ITM + MLM pretraining, VQA         tasks/vqa.py
    video          §2.6  video adapter: Video CoSwin inflated from the image tower              tasks/video.py
    linear_probe,  §3    the image tower judged by a linear probe and by fine-tuning            tasks/classify.py
    classify
"""
from tasks.base import Task
from tasks.classify import ClassifyTask, LinearProbeTask
from tasks.detect import DetectTask
from tasks.pretrain import PretrainTask
from tasks.video import VideoTask
from tasks.vqa import ITMMLMTask, VQATask

TASKS: dict[str, type[Task]] = {
    "pretrain": PretrainTask,
    "detect": DetectTask,
    "itm_mlm": ITMMLMTask,
    "vqa": VQATask,
    "video": VideoTask,
    "linear_probe": LinearProbeTask,
    "classify": ClassifyTask,
}

__all__ = ["TASKS", "Task", "PretrainTask", "DetectTask", "ITMMLMTask", "VQATask", "VideoTask", "LinearProbeTask",
           "ClassifyTask"]
