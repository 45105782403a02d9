import sys
from pathlib import Path

# tests import their shared tiny-model builders as `tiny`
sys.path.insert(0, str(Path(__file__).parent))
