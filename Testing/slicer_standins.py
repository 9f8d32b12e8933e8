"""Stand-ins for the parts of 3D Slicer that pip cannot install, so Slicer's own Python runs here.

slicer-core gives real MRML but no Qt, no parameterNodeWrapper and no ScriptedLoadableModule.
Those Slicer files are in ../shared/reference; they import `qt` and `ctk`. This module
provides minimal `qt`/`ctk` modules whose widget classes behave like Qt's where Slicer's
GUI connectors touch them (properties, ranges, signals), builds the module's .ui from
those classes by the class names the .ui gives, and loads the reference packages under
their real names. Nothing here is a copy of Slicer; it is only what the reference code needs.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
SLICER_PY = REFERENCE / "slicer" / "Base" / "Python" / "slicer"
SLICERRT = REFERENCE / "slicerrt"
UI_FILE = REPO / "DoseDiff" / "Resources" / "UI" / "DoseDiff.ui"


def reference_missing_reason() -> str | None:
    """Why the reference tests cannot run here, or None when they can."""
    if not (SLICER_PY / "parameterNodeWrapper" / "guiConnectors.py").exists():
        return f"Slicer reference sources not found at {REFERENCE} (see shared/reference/README.md)"
    return None


class Signal:
    """A Qt signal: connect, disconnect, emit."""

    def __init__(self) -> None:
        self._slots: list = []

    def connect(self, slot) -> None:
        self._slots.append(slot)

    def disconnect(self, slot) -> None:
        self._slots.remove(slot)

    def emit(self, *args) -> None:
        """Like PythonQt, a slot taking fewer arguments than the signal gets the first ones."""
        import inspect

        for slot in list(self._slots):
            params = inspect.signature(slot).parameters.values()
            if any(p.kind == p.VAR_POSITIONAL for p in params):
                slot(*args)
            else:
                slot(*args[:sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)])


class QWidget:
    """Parent/child tree and dynamic properties, as Slicer's connectGui walks them."""

    def __init__(self, parent: "QWidget | None" = None) -> None:
        self._properties: dict = {}
        self._children: list[QWidget] = []
        self._parent = parent
        self.objectName = ""
        if parent is not None:
            parent._children.append(self)

    def property(self, name: str):
        return self._properties.get(name)

    def setProperty(self, name: str, value) -> None:
        self._properties[name] = value

    def parent(self):
        return self._parent

    def isWidgetType(self) -> bool:
        return True

    def findChildren(self, cls) -> list:
        found = []
        for child in self._children:
            if isinstance(child, cls):
                found.append(child)
            found += child.findChildren(cls)
        return found


class NotifyingProperty:
    """A Qt property whose change emits the widget's signal (as textChanged, stateChanged, ...)."""

    def __init__(self, signal: str, default, convert=lambda widget, v: v, emitted=lambda v: v) -> None:
        self.signal, self.default, self.convert, self.emitted = signal, default, convert, emitted

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, widget, owner=None):
        return self if widget is None else widget.__dict__.get(self.slot, self.default)

    def __set__(self, widget, value) -> None:
        value = self.convert(widget, value)
        if value != self.__get__(widget):
            widget.__dict__[self.slot] = value
            widget.__dict__.setdefault(self.signal, Signal()).emit(self.emitted(value))


class NotifyingWidget(QWidget):
    """Creates the signals its NotifyingProperty attributes emit."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        for attr in type(self).__dict__.values():
            if isinstance(attr, NotifyingProperty):
                self.__dict__.setdefault(attr.signal, Signal())


class QLabel(QWidget):
    pass


class QPushButton(QWidget):
    pass


class QProgressBar(QWidget):
    pass


class QSlider(QWidget):
    pass


class QDoubleSpinBox(QWidget):
    pass


class QTextEdit(QWidget):
    pass


class QColor:
    pass


class QSpinBox(NotifyingWidget):
    """Qt's defaults (0..99), clamping and valueChanged only on a change."""

    value = NotifyingProperty("valueChanged", 0, lambda w, v: min(max(int(v), w._min), w._max))
    minimum = property(lambda self: self._min, lambda self, v: self.setMinimum(v))
    maximum = property(lambda self: self._max, lambda self, v: self.setMaximum(v))

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._min, self._max = 0, 99

    def setMinimum(self, v: int) -> None:
        self._min = int(v)
        self._max = max(self._max, self._min)
        self.value = self.value

    def setMaximum(self, v: int) -> None:
        self._max = int(v)
        self._min = min(self._min, self._max)
        self.value = self.value

    def setRange(self, lo: int, hi: int) -> None:
        self.setMinimum(lo)
        self.setMaximum(hi)


class QComboBox(NotifyingWidget):
    currentIndex = NotifyingProperty("currentIndexChanged", -1)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._items: list[str] = []

    def clear(self) -> None:
        self._items = []
        self.__dict__["_currentIndex"] = -1  # Qt's clear() resets the index

    def addItem(self, text: str) -> None:
        self._items.append(str(text))
        if self.currentIndex < 0:
            self.currentIndex = 0

    def count(self) -> int:
        return len(self._items)

    def itemText(self, i: int) -> str:
        return self._items[i]

    @property
    def currentText(self) -> str:
        return self._items[self.currentIndex] if self.currentIndex >= 0 else ""


class QLineEdit(NotifyingWidget):
    text = NotifyingProperty("textChanged", "")


class QCheckBox(NotifyingWidget):
    checked = NotifyingProperty("stateChanged", False, lambda w, v: bool(v), lambda v: 2 if v else 0)


class ctkCollapsibleButton(QWidget):
    pass


class ctkPathLineEdit(NotifyingWidget):
    currentPath = NotifyingProperty("currentPathChanged", "")


class qMRMLWidget(QWidget):
    pass


class qMRMLNodeComboBox(QWidget):
    """Like Slicer's: without noneEnabled, setting a scene selects the first node of its types."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.currentNodeChanged = Signal()
        self.nodeTypes: list[str] = []
        self.noneEnabled = False
        self.addEnabled = True
        self.removeEnabled = True
        self._node = None
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        if not self.noneEnabled and self._node is None:
            for t in self.nodeTypes:
                first = scene.GetFirstNodeByClass(t)
                if first is not None:
                    self.setCurrentNode(first)
                    break

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is None and not self.noneEnabled and self._scene is not None:
            return  # Slicer's combo box keeps a node when "None" is not offered
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)


def _unbound_types(names: list[str]) -> dict[str, type]:
    """Widget classes Slicer's connectors name but this .ui never uses: distinct, never instantiated."""
    return {n: type(n, (QWidget,), {}) for n in names}


def make_qt() -> types.ModuleType:
    qt = types.ModuleType("qt")
    for cls in (QWidget, QLabel, QPushButton, QProgressBar, QSlider, QDoubleSpinBox, QTextEdit, QColor,
                QSpinBox, QComboBox, QLineEdit, QCheckBox):
        setattr(qt, cls.__name__, cls)
    for name, cls in _unbound_types(["QVBoxLayout", "QFormLayout"]).items():
        setattr(qt, name, cls)
    return qt


def make_ctk() -> types.ModuleType:
    ctk = types.ModuleType("ctk")
    for cls in (ctkCollapsibleButton, ctkPathLineEdit):
        setattr(ctk, cls.__name__, cls)
    for name, cls in _unbound_types(["ctkCheckBox", "ctkCheckablePushButton", "ctkSliderWidget", "ctkDoubleSlider",
                                     "ctkDoubleSpinBox", "ctkComboBox", "ctkRangeWidget", "ctkDoubleRangeSlider",
                                     "ctkDirectoryButton", "ctkColorPickerButton"]).items():
        setattr(ctk, name, cls)
    return ctk


SLICER_WIDGETS = {"qMRMLNodeComboBox": qMRMLNodeComboBox, "qMRMLWidget": qMRMLWidget,
                  **_unbound_types(["qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qSlicerWidget"])}


def _load(name: str, path: Path, package_dir: Path | None = None) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def install(monkeypatch) -> types.ModuleType:
    """qt, ctk and Slicer's parameterNodeWrapper/i18n/ScriptedLoadableModule, undone by monkeypatch."""
    import slicer

    monkeypatch.setitem(sys.modules, "qt", make_qt())
    monkeypatch.setitem(sys.modules, "ctk", make_ctk())
    before = set(sys.modules)
    for name, cls in SLICER_WIDGETS.items():
        monkeypatch.setattr(slicer, name, cls, raising=False)
    _load("slicer.i18n", SLICER_PY / "i18n.py")
    _load("slicer.parameterNodeWrapper", SLICER_PY / "parameterNodeWrapper" / "__init__.py",
          SLICER_PY / "parameterNodeWrapper")
    _load("slicer.ScriptedLoadableModule", SLICER_PY / "ScriptedLoadableModule.py")
    for m in [m for m in sys.modules if m not in before]:
        module = sys.modules.pop(m)
        monkeypatch.setitem(sys.modules, m, module)  # recorded as absent: removed again on undo
    monkeypatch.syspath_prepend(str(REPO / "DoseDiff"))
    return sys.modules["slicer.parameterNodeWrapper"]


def _ui_value(prop: ET.Element):
    child = prop[0]
    if child.tag == "number":
        return int(child.text)
    if child.tag == "bool":
        return child.text == "true"
    if child.tag == "stringlist":
        return [s.text for s in child.findall("string")]
    return child.text


def build_ui(path: Path = UI_FILE):
    """The .ui as stand-in widgets, by the class names it gives; returns (root, {name: widget}, xml)."""
    qt, ctk, slicer = sys.modules["qt"], sys.modules["ctk"], sys.modules["slicer"]
    root_xml = ET.parse(path).getroot()
    widgets: dict[str, QWidget] = {}

    def make(elem: ET.Element, parent):
        cls_name = elem.get("class")
        cls = getattr(qt, cls_name, None) or getattr(ctk, cls_name, None) or getattr(slicer, cls_name, None)
        if cls is None:
            raise AssertionError(f"The .ui uses {cls_name}, which no stand-in defines")
        w = cls(parent)
        w.objectName = elem.get("name")
        widgets[w.objectName] = w
        for prop in elem.findall("property"):
            name, value = prop.get("name"), _ui_value(prop)
            if prop.get("stdset") == "0":
                w.setProperty(name, value)
            elif name in ("minimum", "maximum", "value", "noneEnabled", "nodeTypes", "addEnabled",
                          "removeEnabled", "text", "checked"):
                setattr(w, name, value)
        for item in elem.findall("item"):
            w.addItem(_ui_value(item.find("property")))
        for child in elem.iter():
            if child is not elem and child.tag == "widget" and _nearest_widget(elem, child) is elem:
                make(child, w)
        return w

    root = make(root_xml.find("widget"), None)
    return root, widgets, root_xml


def _nearest_widget(top: ET.Element, target: ET.Element) -> ET.Element | None:
    """The closest <widget> ancestor of target below top (layouts and items sit in between)."""
    def walk(node, owner):
        for child in node:
            if child is target:
                return owner
            found = walk(child, child if child.tag == "widget" else owner)
            if found is not None:
                return found
        return None
    return walk(top, top)
