from SegmentEditorEffects.AbstractScriptedSegmentEditorEffect import *

from .SegmentEditorEffect import *
