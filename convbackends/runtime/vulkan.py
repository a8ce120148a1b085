"""Vulkan runtime: instance, devices, pooled buffers, cached pipelines, replayable command buffers; it knows
no op (those are in backends/vulkan/). Importing it raises OSError where libvulkan is missing, which the
registry reports.

Every handle made here is counted in `LIVE` (created minus destroyed, per kind), so tests can prove that
closing releases everything; devices and the instance are destroyed at interpreter exit.

Thread safety: a Device's caches, pools and queue are guarded by its re-entrant `lock`; submissions on one
device are serialised (one fence). Finalizers hand their releases to `Device.release_soon`, which never
runs them inside a half-done update of the same thread.
"""
from __future__ import annotations

import atexit
import struct
import threading
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

import numpy as np
import vulkan as vk

from .base import Backend, BackendUnavailable, DeviceInfo

LIVE: Counter = Counter()
FENCE_TIMEOUT_NS = 600 * 10**9
API_VERSION = vk.VK_MAKE_VERSION(1, 1, 0)
DEVICE_TYPES = {
    vk.VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: "gpu",
    vk.VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: "integrated-gpu",
    vk.VK_PHYSICAL_DEVICE_TYPE_CPU: "cpu",
}
_SETS_PER_POOL = 64
_MIN_BUFFER = 256
_WHOLE_SIZE = (1 << 64) - 1  # VK_WHOLE_SIZE; the bindings' constant is negative
_POOL_FREE_LIMIT = 256 << 20  # free bytes a device keeps for reuse before it gives memory back
# Pipelines no layer uses that a device keeps for the next layer (least recently used go first): a
# pipeline costs milliseconds to seconds to build, and to keep, on llvmpipe, about 6 MB of JIT code (16
# kept: about 100 MB; destroyed, the memory goes back: 30 built and released grew RSS by 18 MB).
PIPELINES_KEPT = 16

# Binding kinds a pipeline layout is made of: a storage buffer, or a uniform texel buffer of one format.
STORAGE = (vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, None)
TEXEL_FLOAT = (vk.VK_DESCRIPTOR_TYPE_UNIFORM_TEXEL_BUFFER, vk.VK_FORMAT_R32_SFLOAT)
TEXEL_VEC4 = (vk.VK_DESCRIPTOR_TYPE_UNIFORM_TEXEL_BUFFER, vk.VK_FORMAT_R32G32B32A32_SFLOAT)
_TEXEL_BYTES = {TEXEL_FLOAT[1]: 4, TEXEL_VEC4[1]: 16}

_lock = threading.RLock()
_instance = None
_devices: dict[int, "Device"] = {}


def _created(kind: str, handle):
    LIVE[kind] += 1
    return handle


def _destroyed(kind: str) -> None:
    LIVE[kind] -= 1


def instance():
    global _instance
    with _lock:
        if _instance is None:
            app = vk.VkApplicationInfo(pApplicationName="convbackends", apiVersion=API_VERSION)
            _instance = _created("instance", vk.vkCreateInstance(vk.VkInstanceCreateInfo(pApplicationInfo=app), None))
            atexit.register(shutdown)
        return _instance


def shutdown() -> None:
    """Destroy every device and the instance; runs at exit, safe to call again."""
    global _instance
    with _lock:
        for device in list(_devices.values()):
            device.close()
        _devices.clear()
        if _instance is not None:
            vk.vkDestroyInstance(_instance, None)
            _destroyed("instance")
            _instance = None


def _compute_family(physical) -> int | None:
    for i, family in enumerate(vk.vkGetPhysicalDeviceQueueFamilyProperties(physical)):
        if family.queueFlags & vk.VK_QUEUE_COMPUTE_BIT:
            return i
    return None


def physical_devices() -> list:
    """Vulkan 1.1 physical devices with a compute queue, in driver order (1.1: subgroups, dispatch base)."""
    return [p for p in vk.vkEnumeratePhysicalDevices(instance())
            if _compute_family(p) is not None and vk.vkGetPhysicalDeviceProperties(p).apiVersion >= API_VERSION]


def _subgroup(physical) -> tuple[int, bool]:
    """Compute subgroup size and whether compute shaders may shuffle (Vulkan 1.1 subgroup properties)."""
    sub = vk.VkPhysicalDeviceSubgroupProperties(sType=vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES)
    props = vk.ffi.new("VkPhysicalDeviceProperties2*", {
        "sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, "pNext": vk.ffi.addressof(sub)})
    vk.vkGetPhysicalDeviceProperties2(physical, props)
    shuffle = bool(sub.supportedOperations & vk.VK_SUBGROUP_FEATURE_SHUFFLE_BIT
                   and sub.supportedStages & vk.VK_SHADER_STAGE_COMPUTE_BIT)
    return sub.subgroupSize, shuffle


def _version(v: int) -> str:
    return f"{v >> 22}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"


def describe(physical) -> tuple[str, str, dict]:
    """(name, type, facts) as DeviceInfo wants them."""
    props = vk.vkGetPhysicalDeviceProperties(physical)
    limits = props.limits
    memory = vk.vkGetPhysicalDeviceMemoryProperties(physical)
    facts = {
        "api_version": _version(props.apiVersion),
        "driver_version": props.driverVersion,
        "vendor_id": hex(props.vendorID),
        "max_compute_work_group_count": tuple(limits.maxComputeWorkGroupCount),
        "max_compute_work_group_size": tuple(limits.maxComputeWorkGroupSize),
        "max_compute_work_group_invocations": limits.maxComputeWorkGroupInvocations,
        "max_compute_shared_memory_size": limits.maxComputeSharedMemorySize,
        "max_storage_buffer_range": limits.maxStorageBufferRange,
        "max_texel_buffer_elements": limits.maxTexelBufferElements,
        "subgroup_size": _subgroup(physical)[0],
        "memory_heaps_bytes": tuple(memory.memoryHeaps[i].size for i in range(memory.memoryHeapCount)),
        "timestamp_period_ns": limits.timestampPeriod,
    }
    name = props.deviceName if isinstance(props.deviceName, str) else vk.ffi.string(props.deviceName).decode()
    return name, DEVICE_TYPES.get(props.deviceType, "other"), facts


def device(index: int) -> "Device":
    """The logical device for physical device `index`, created on first use and cached."""
    with _lock:
        if index not in _devices:
            _devices[index] = Device(physical_devices()[index])
        return _devices[index]


class Buffer:
    """A VkBuffer with its own memory; host-visible buffers stay mapped as a float32 view."""

    def __init__(self, dev: "Device", nbytes: int, host: bool):
        self.device, self.nbytes, self.host = dev, nbytes, host
        usage = (vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_UNIFORM_TEXEL_BUFFER_BIT
                 | vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT)
        handle = dev.handle
        self.buffer = _created("buffer", vk.vkCreateBuffer(handle, vk.VkBufferCreateInfo(
            size=nbytes, usage=usage, sharingMode=vk.VK_SHARING_MODE_EXCLUSIVE), None))
        need = vk.vkGetBufferMemoryRequirements(handle, self.buffer)
        type_index = dev.memory_type(need.memoryTypeBits, host)
        try:
            self.memory = _created("memory", vk.vkAllocateMemory(handle, vk.VkMemoryAllocateInfo(
                allocationSize=need.size, memoryTypeIndex=type_index), None))
        except vk.VkError:
            vk.vkDestroyBuffer(handle, self.buffer, None)
            _destroyed("buffer")
            raise
        vk.vkBindBufferMemory(handle, self.buffer, self.memory, 0)
        self.array = None
        self._views: dict[int, object] = {}
        if host:
            self.coherent = dev.coherent(type_index)
            self.array = np.frombuffer(vk.vkMapMemory(handle, self.memory, 0, nbytes, 0), np.float32)

    def write(self, data: np.ndarray) -> None:
        """Copy data's bytes to the buffer's start (float32, or any dtype: int32 sites are copied, not cast)."""
        self.array.view(data.dtype)[: data.size] = data.reshape(-1)
        self.flush()

    def flush(self) -> None:
        """Make host writes visible to the device where the memory is not coherent."""
        if not self.coherent:
            vk.vkFlushMappedMemoryRanges(self.device.handle, 1, [self._whole()])

    def read(self, count: int) -> np.ndarray:
        if not self.coherent:
            vk.vkInvalidateMappedMemoryRanges(self.device.handle, 1, [self._whole()])
        return self.array[:count].copy()

    def _whole(self):
        return vk.VkMappedMemoryRange(memory=self.memory, offset=0, size=_WHOLE_SIZE)

    def view(self, fmt: int):
        """A texel view of the buffer in format fmt (as much as maxTexelBufferElements allows), made once."""
        if fmt not in self._views:
            texel = _TEXEL_BYTES[fmt]
            size = min(self.nbytes, self.device.limits.maxTexelBufferElements * texel) // texel * texel
            self._views[fmt] = _created("buffer_view", vk.vkCreateBufferView(self.device.handle, vk.VkBufferViewCreateInfo(
                buffer=self.buffer, format=fmt, offset=0, range=size), None))
        return self._views[fmt]

    def destroy(self) -> None:
        for view in self._views.values():
            vk.vkDestroyBufferView(self.device.handle, view, None)
            _destroyed("buffer_view")
        self._views.clear()
        if self.array is not None:
            self.array = None
            vk.vkUnmapMemory(self.device.handle, self.memory)
        vk.vkDestroyBuffer(self.device.handle, self.buffer, None)
        vk.vkFreeMemory(self.device.handle, self.memory, None)
        _destroyed("buffer")
        _destroyed("memory")


class Pipeline:
    """A compute pipeline for one (shader, specialization constants); binding i is of kind kinds[i]
    (STORAGE, TEXEL_FLOAT or TEXEL_VEC4). `users` counts the holders Device.pipeline handed it to."""

    def __init__(self, dev: "Device", spirv: bytes, constants: dict[int, int | float | bool], kinds: tuple,
                 push_bytes: int):
        h = dev.handle
        self.device, self.kinds, self.users = dev, kinds, 0
        entries = [vk.VkDescriptorSetLayoutBinding(
            binding=i, descriptorType=kind[0], descriptorCount=1,
            stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT) for i, kind in enumerate(kinds)]
        self.set_layout = _created("descriptor_set_layout", vk.vkCreateDescriptorSetLayout(
            h, vk.VkDescriptorSetLayoutCreateInfo(bindingCount=len(kinds), pBindings=entries), None))
        push = vk.VkPushConstantRange(stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT, offset=0, size=push_bytes)
        self.layout = _created("pipeline_layout", vk.vkCreatePipelineLayout(h, vk.VkPipelineLayoutCreateInfo(
            setLayoutCount=1, pSetLayouts=[self.set_layout], pushConstantRangeCount=1,
            pPushConstantRanges=[push]), None))
        module = vk.vkCreateShaderModule(h, vk.VkShaderModuleCreateInfo(codeSize=len(spirv), pCode=spirv), None)
        ids = sorted(constants)
        data = b"".join(_constant_bytes(constants[i]) for i in ids)
        info = vk.VkSpecializationInfo(
            mapEntryCount=len(ids),
            pMapEntries=[vk.VkSpecializationMapEntry(constantID=cid, offset=4 * k, size=4) for k, cid in enumerate(ids)],
            dataSize=len(data), pData=vk.ffi.from_buffer(data))
        stage = vk.VkPipelineShaderStageCreateInfo(
            stage=vk.VK_SHADER_STAGE_COMPUTE_BIT, module=module, pName="main", pSpecializationInfo=info)
        try:
            self.pipeline = _created("pipeline", vk.vkCreateComputePipelines(h, vk.VK_NULL_HANDLE, 1, [
                vk.VkComputePipelineCreateInfo(flags=vk.VK_PIPELINE_CREATE_DISPATCH_BASE_KHR, stage=stage,
                                               layout=self.layout)], None)[0])
        finally:
            vk.vkDestroyShaderModule(h, module, None)

    def destroy(self) -> None:
        h = self.device.handle
        vk.vkDestroyPipeline(h, self.pipeline, None)
        vk.vkDestroyPipelineLayout(h, self.layout, None)
        vk.vkDestroyDescriptorSetLayout(h, self.set_layout, None)
        for kind in ("pipeline", "pipeline_layout", "descriptor_set_layout"):
            _destroyed(kind)


def _constant_bytes(value) -> bytes:
    if isinstance(value, float):
        return struct.pack("<f", value)
    return struct.pack("<i", int(value))


class Device:
    """One logical device with a compute queue, and the caches every layer on it shares."""

    def __init__(self, physical):
        self.physical = physical
        # limits is a view into props: keep props alive with it.
        self.properties = props = vk.vkGetPhysicalDeviceProperties(physical)
        self.limits = props.limits
        self.type = DEVICE_TYPES.get(props.deviceType, "other")
        self.subgroup_size, self.subgroup_shuffle = _subgroup(physical)
        self.family = _compute_family(physical)
        family = vk.vkGetPhysicalDeviceQueueFamilyProperties(physical)[self.family]
        self.timestamp_period_ns = self.limits.timestampPeriod if family.timestampValidBits else None
        self._memory = vk.vkGetPhysicalDeviceMemoryProperties(physical)
        queue = vk.VkDeviceQueueCreateInfo(queueFamilyIndex=self.family, queueCount=1, pQueuePriorities=[1.0])
        self.handle = _created("device", vk.vkCreateDevice(physical, vk.VkDeviceCreateInfo(
            queueCreateInfoCount=1, pQueueCreateInfos=[queue]), None))
        self.queue = vk.vkGetDeviceQueue(self.handle, self.family, 0)
        self.command_pool = _created("command_pool", vk.vkCreateCommandPool(self.handle, vk.VkCommandPoolCreateInfo(
            flags=vk.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT, queueFamilyIndex=self.family), None))
        self.fence = _created("fence", vk.vkCreateFence(self.handle, vk.VkFenceCreateInfo(), None))
        # CPU devices and integrated GPUs share memory with the host: kernels use mapped buffers directly.
        # Discrete GPUs (even with host-visible VRAM, which the host reads slowly) get staging copies.
        self.unified = self.type in ("cpu", "integrated-gpu") and self._find_type(
            ~0, vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT) is not None
        self.lock = threading.RLock()
        self._pipelines: OrderedDict[tuple, Pipeline] = OrderedDict()  # least recently asked for first
        self._pending: deque[Callable[[], None]] = deque()  # releases handed over by finalizers
        self._descriptor_pools: list = []
        self._set_pool: dict[int, object] = {}
        self.recordings: set["Recording"] = set()  # open ones, closed with the device
        self._free: dict[tuple[int, bool], list[Buffer]] = {}
        self._buffers: set[Buffer] = set()
        self.pool_bytes = 0  # bytes held by this device's buffers, in use or free for reuse
        self._free_bytes = 0

    # -- memory ------------------------------------------------------------------------------------------
    def _find_type(self, bits: int, flags: int) -> int | None:
        for i in range(self._memory.memoryTypeCount):
            if bits & (1 << i) and self._memory.memoryTypes[i].propertyFlags & flags == flags:
                return i
        return None

    def memory_type(self, bits: int, host: bool) -> int:
        visible, coherent = vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT, vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
        wanted = ([visible | coherent | vk.VK_MEMORY_PROPERTY_HOST_CACHED_BIT, visible | coherent, visible] if host
                  else [vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, 0])
        for flags in wanted:
            found = self._find_type(bits, flags)
            if found is not None:
                return found
        raise RuntimeError("vulkan: the device has no suitable memory type for a storage buffer")

    def coherent(self, type_index: int) -> bool:
        return bool(self._memory.memoryTypes[type_index].propertyFlags & vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT)

    def acquire(self, nbytes: int, host: bool, zeroed: bool = False) -> Buffer:
        """A buffer of at least nbytes from the pool, keyed by size class (eight per octave: at most 1/8
        wasted, and buffers of nearby sizes are shared across shapes). A pooled buffer holds its last user's
        data: `zeroed` fills it with zeros first, for buffers with parts a plan reads but never writes."""
        buf = self._acquire(nbytes, host)
        if zeroed:
            self.fill(buf, 0.0)
        return buf

    def _acquire(self, nbytes: int, host: bool) -> Buffer:
        step = 1 << max(_MIN_BUFFER.bit_length() - 1, nbytes.bit_length() - 3)
        size = max(_MIN_BUFFER, -(-nbytes // step) * step)
        with self.lock:
            free = self._free.get((size, host))
            if free:
                self._free_bytes -= size
                return free.pop()
            try:
                buf = Buffer(self, size, host)
            except vk.VkError:
                self._trim()  # give the pooled memory back and try once more
                try:
                    buf = Buffer(self, size, host)
                except vk.VkError as exc:
                    raise MemoryError(f"vulkan: cannot allocate {size} bytes on the device "
                                      f"({type(exc).__name__})") from None
            self._buffers.add(buf)
            self.pool_bytes += size
            return buf

    @property
    def in_use_bytes(self) -> int:
        """Bytes of buffers handed out and not yet released."""
        return self.pool_bytes - self._free_bytes

    def release(self, buf: Buffer) -> None:
        with self.lock:
            if buf not in self._buffers:
                return
            self._free.setdefault((buf.nbytes, buf.host), []).append(buf)
            self._free_bytes += buf.nbytes
            if self._free_bytes > _POOL_FREE_LIMIT:
                self._trim()

    def _trim(self) -> None:
        for free in self._free.values():
            while free:
                self._destroy_buffer(free.pop())
        self._free_bytes = 0

    def _destroy_buffer(self, buf: Buffer) -> None:
        self._buffers.discard(buf)
        self.pool_bytes -= buf.nbytes
        buf.destroy()

    # -- pipelines and descriptors ----------------------------------------------------------------------
    def pipeline(self, name: str, spirv: bytes, constants: dict, kinds: tuple, push_bytes: int) -> Pipeline:
        """The pipeline for these constants, built once and shared; every caller gives it back with
        `release_pipeline`, after which the cache keeps it among the PIPELINES_KEPT unused ones."""
        key = (name, tuple(sorted(constants.items())), kinds, push_bytes)
        with self.lock:
            found = self._pipelines.get(key)
            if found is None:
                found = self._pipelines[key] = Pipeline(self, spirv, constants, kinds, push_bytes)
            self._pipelines.move_to_end(key)
            found.users += 1
            return found

    def release_pipeline(self, pipeline: Pipeline) -> None:
        with self.lock:
            if self.handle is None:  # closed: the device destroyed it
                return
            pipeline.users -= 1
            unused = [key for key, p in self._pipelines.items() if p.users == 0]
            for key in unused[:max(0, len(unused) - PIPELINES_KEPT)]:
                self._pipelines.pop(key).destroy()

    def release_soon(self, release: Callable[[], None]) -> None:
        """Run `release` (a collected layer's finalizer) now, unless this thread is inside the device's lock:
        the garbage collector may start a finalizer anywhere, also halfway through an update of the pools.
        Then it runs at this device's next submission."""
        self._pending.append(release)
        self._run_pending()

    def _run_pending(self) -> None:
        if not self._pending or self.lock._is_owned():  # RLock's own test, which threading.Condition uses
            return
        with self.lock:
            while self._pending:
                self._pending.popleft()()

    def descriptor_set(self, pipeline: Pipeline, buffers: list[Buffer]):
        with self.lock:
            info = lambda pool: vk.VkDescriptorSetAllocateInfo(  # noqa: E731
                descriptorPool=pool, descriptorSetCount=1, pSetLayouts=[pipeline.set_layout])
            for pool in self._descriptor_pools:
                try:
                    found = vk.vkAllocateDescriptorSets(self.handle, info(pool))[0]
                    break
                except (vk.VkErrorOutOfPoolMemory, vk.VkErrorFragmentedPool):
                    continue
            else:
                pool = self._new_descriptor_pool()
                found = vk.vkAllocateDescriptorSets(self.handle, info(pool))[0]
            self._set_pool[id(found)] = pool
        writes = [self._write(found, i, kind, buf) for i, (kind, buf) in enumerate(zip(pipeline.kinds, buffers))]
        vk.vkUpdateDescriptorSets(self.handle, len(writes), writes, 0, None)
        return _created("descriptor_set", found)

    def _write(self, descriptor_set, binding: int, kind: tuple, buf: Buffer):
        descriptor_type, fmt = kind
        if fmt is not None:
            return vk.VkWriteDescriptorSet(dstSet=descriptor_set, dstBinding=binding, descriptorCount=1,
                                           descriptorType=descriptor_type, pTexelBufferView=[buf.view(fmt)])
        info = vk.VkDescriptorBufferInfo(buffer=buf.buffer, offset=0,
                                         range=min(buf.nbytes, self.limits.maxStorageBufferRange))
        return vk.VkWriteDescriptorSet(dstSet=descriptor_set, dstBinding=binding, descriptorCount=1,
                                       descriptorType=descriptor_type, pBufferInfo=[info])

    def _new_descriptor_pool(self):
        sizes = [vk.VkDescriptorPoolSize(type=kind, descriptorCount=8 * _SETS_PER_POOL) for kind in (
            vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, vk.VK_DESCRIPTOR_TYPE_UNIFORM_TEXEL_BUFFER)]
        pool = _created("descriptor_pool", vk.vkCreateDescriptorPool(self.handle, vk.VkDescriptorPoolCreateInfo(
            flags=vk.VK_DESCRIPTOR_POOL_CREATE_FREE_DESCRIPTOR_SET_BIT, maxSets=_SETS_PER_POOL,
            poolSizeCount=len(sizes), pPoolSizes=sizes), None))
        self._descriptor_pools.append(pool)
        return pool

    def free_set(self, descriptor_set) -> None:
        with self.lock:
            pool = self._set_pool.pop(id(descriptor_set))
            vk.vkFreeDescriptorSets(self.handle, pool, 1, [descriptor_set])
            _destroyed("descriptor_set")

    def fill(self, buf: Buffer, value: float) -> None:
        """Fill buf with the float32 value: on the host where it is mapped, else by one recorded vkCmdFillBuffer."""
        if buf.host:
            buf.array[:] = value
            buf.flush()
            return
        Recording.once(self, fills=[(buf, value)])

    # -- submission ---------------------------------------------------------------------------------------
    def submit(self, command_buffer) -> None:
        """Submit and wait; one fence per device, so submissions on a device are serialised."""
        self._run_pending()
        with self.lock:
            vk.vkQueueSubmit(self.queue, 1, [vk.VkSubmitInfo(commandBufferCount=1, pCommandBuffers=[command_buffer])],
                             self.fence)
            try:
                vk.vkWaitForFences(self.handle, 1, [self.fence], vk.VK_TRUE, FENCE_TIMEOUT_NS)
            except vk.VkTimeout:
                raise RuntimeError("vulkan: the device did not finish within 600 s") from None
            vk.vkResetFences(self.handle, 1, [self.fence])

    def close(self) -> None:
        with self.lock:
            if self.handle is None:
                return
            vk.vkDeviceWaitIdle(self.handle)
            self._pending.clear()  # what they would release goes below
            for recording in list(self.recordings):
                recording.close()
            for buf in list(self._buffers):
                self._destroy_buffer(buf)
            self._free.clear()
            for pipeline in self._pipelines.values():
                pipeline.destroy()
            self._pipelines.clear()
            for pool in self._descriptor_pools:
                vk.vkDestroyDescriptorPool(self.handle, pool, None)
                _destroyed("descriptor_pool")
            LIVE["descriptor_set"] -= len(self._set_pool)
            self._set_pool.clear()
            self._descriptor_pools.clear()
            vk.vkDestroyFence(self.handle, self.fence, None)
            vk.vkDestroyCommandPool(self.handle, self.command_pool, None)
            vk.vkDestroyDevice(self.handle, None)
            for kind in ("fence", "command_pool", "device"):
                _destroyed(kind)
            self.handle = None


class Dispatch:
    """One pipeline launch: its buffers, push constants and work-group counts."""

    def __init__(self, pipeline: Pipeline, buffers: list[Buffer], push: bytes, groups: tuple[int, int, int]):
        self.pipeline, self.buffers, self.push, self.groups = pipeline, buffers, push, groups


class Recording:
    """A command buffer recorded once and replayed: fills, uploads, dispatches, readbacks, timestamps.

    `copies_in`/`copies_out` pair host staging buffers with device buffers; they are empty on unified
    memory, where kernels use the mapped buffers themselves. `fills` are (device buffer, float32 value) pairs.
    """

    def __init__(self, dev: Device, dispatches: list[Dispatch], copies_in=(), copies_out=(), fills=()):
        self.device = dev
        h = dev.handle
        self.sets = [dev.descriptor_set(d.pipeline, d.buffers) for d in dispatches]
        self.command_buffer = _created("command_buffer", vk.vkAllocateCommandBuffers(h, vk.VkCommandBufferAllocateInfo(
            commandPool=dev.command_pool, level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY, commandBufferCount=1))[0])
        self.queries = None
        if dev.timestamp_period_ns:
            self.queries = _created("query_pool", vk.vkCreateQueryPool(h, vk.VkQueryPoolCreateInfo(
                queryType=vk.VK_QUERY_TYPE_TIMESTAMP, queryCount=2), None))
        dev.recordings.add(self)
        self._record(dispatches, copies_in, copies_out, fills)

    def _record(self, dispatches, copies_in, copies_out, fills) -> None:
        cmd, limit = self.command_buffer, tuple(self.device.limits.maxComputeWorkGroupCount)
        vk.vkBeginCommandBuffer(cmd, vk.VkCommandBufferBeginInfo())
        for buf, value in fills:
            vk.vkCmdFillBuffer(cmd, buf.buffer, 0, _WHOLE_SIZE, int(np.float32(value).view(np.uint32)))
        if fills:  # before the copies in, and any later submission's copies, dispatches and reads
            _barrier(cmd, vk.VK_PIPELINE_STAGE_TRANSFER_BIT, vk.VK_ACCESS_TRANSFER_WRITE_BIT,
                     vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | vk.VK_PIPELINE_STAGE_TRANSFER_BIT,
                     vk.VK_ACCESS_SHADER_READ_BIT | vk.VK_ACCESS_SHADER_WRITE_BIT
                     | vk.VK_ACCESS_TRANSFER_READ_BIT | vk.VK_ACCESS_TRANSFER_WRITE_BIT)
        for host, dev_buf in copies_in:
            vk.vkCmdCopyBuffer(cmd, host.buffer, dev_buf.buffer, 1, [vk.VkBufferCopy(size=host.nbytes)])
        _barrier(cmd, vk.VK_PIPELINE_STAGE_TRANSFER_BIT | vk.VK_PIPELINE_STAGE_HOST_BIT,
                 vk.VK_ACCESS_TRANSFER_WRITE_BIT | vk.VK_ACCESS_HOST_WRITE_BIT)
        if self.queries:
            vk.vkCmdResetQueryPool(cmd, self.queries, 0, 2)
            vk.vkCmdWriteTimestamp(cmd, vk.VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, self.queries, 0)
        for d, descriptor_set in zip(dispatches, self.sets):
            layout = d.pipeline.layout
            vk.vkCmdBindPipeline(cmd, vk.VK_PIPELINE_BIND_POINT_COMPUTE, d.pipeline.pipeline)
            vk.vkCmdBindDescriptorSets(cmd, vk.VK_PIPELINE_BIND_POINT_COMPUTE, layout, 0, 1, [descriptor_set], 0, None)
            vk.vkCmdPushConstants(cmd, layout, vk.VK_SHADER_STAGE_COMPUTE_BIT, 0, len(d.push), vk.ffi.from_buffer(d.push))
            # Work-group counts above the device limit are split into several dispatches with a base offset.
            for bz in range(0, d.groups[2], limit[2]):
                for by in range(0, d.groups[1], limit[1]):
                    for bx in range(0, d.groups[0], limit[0]):
                        vk.vkCmdDispatchBase(cmd, bx, by, bz, min(limit[0], d.groups[0] - bx),
                                             min(limit[1], d.groups[1] - by), min(limit[2], d.groups[2] - bz))
            _barrier(cmd, vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, vk.VK_ACCESS_SHADER_WRITE_BIT)
        if self.queries:
            vk.vkCmdWriteTimestamp(cmd, vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, self.queries, 1)
        for host, dev_buf in copies_out:
            vk.vkCmdCopyBuffer(cmd, dev_buf.buffer, host.buffer, 1, [vk.VkBufferCopy(size=host.nbytes)])
        _barrier(cmd, vk.VK_PIPELINE_STAGE_TRANSFER_BIT, vk.VK_ACCESS_TRANSFER_WRITE_BIT,
                 vk.VK_PIPELINE_STAGE_HOST_BIT, vk.VK_ACCESS_HOST_READ_BIT)
        vk.vkEndCommandBuffer(cmd)

    @classmethod
    def once(cls, dev: Device, dispatches=(), copies_in=(), copies_out=(), fills=()) -> float | None:
        """Record, submit and free: work that runs once (a fill, an upload, a rulebook build's stages); its
        device seconds as `submit` gives them."""
        recording = cls(dev, list(dispatches), copies_in, copies_out, fills)
        try:
            return recording.submit()
        finally:
            recording.close()

    def submit(self) -> float | None:
        """Run and wait; the device seconds between the timestamps, or None without timestamp support."""
        self.device.submit(self.command_buffer)
        if not self.queries:
            return None
        ticks = vk.ffi.new("uint64_t[2]")
        vk.vkGetQueryPoolResults(self.device.handle, self.queries, 0, 2, 16, ticks, 8,
                                 vk.VK_QUERY_RESULT_64_BIT | vk.VK_QUERY_RESULT_WAIT_BIT)
        return (ticks[1] - ticks[0]) * self.device.timestamp_period_ns * 1e-9

    def close(self) -> None:
        dev = self.device
        if self.command_buffer is None or dev.handle is None:
            self.command_buffer = None
            return
        with dev.lock:
            dev.recordings.discard(self)
            vk.vkFreeCommandBuffers(dev.handle, dev.command_pool, 1, [self.command_buffer])
            _destroyed("command_buffer")
            for descriptor_set in self.sets:
                dev.free_set(descriptor_set)
            if self.queries:
                vk.vkDestroyQueryPool(dev.handle, self.queries, None)
                _destroyed("query_pool")
        self.command_buffer, self.sets, self.queries = None, [], None


def _barrier(cmd, src_stage, src_access, dst_stage=None, dst_access=None) -> None:
    """Make earlier writes visible to the next dispatch or copy (or to the host)."""
    if dst_stage is None:
        dst_stage = vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | vk.VK_PIPELINE_STAGE_TRANSFER_BIT
        dst_access = (vk.VK_ACCESS_SHADER_READ_BIT | vk.VK_ACCESS_SHADER_WRITE_BIT
                      | vk.VK_ACCESS_TRANSFER_READ_BIT)
    barrier = vk.VkMemoryBarrier(srcAccessMask=src_access, dstAccessMask=dst_access)
    vk.vkCmdPipelineBarrier(cmd, src_stage, dst_stage, 0, 1, [barrier], 0, None, 0, None)


def staged(buffer: Callable[[int, bool], Buffer], dev: Device, nbytes: int, copies: list) -> tuple[Buffer, Buffer]:
    """(the mapped buffer a call writes or reads, the buffer shaders use), taken by `buffer(nbytes, host)`: one
    buffer on unified memory; else a device buffer too, the pair appended to `copies` (a Recording's
    copies_in or copies_out)."""
    host = buffer(nbytes, True)
    if dev.unified:
        return host, host
    device = buffer(nbytes, False)
    copies.append((host, device))
    return host, device


def upload(dev: Device, array: np.ndarray) -> Buffer:
    """A device buffer holding `array`, written directly on unified memory, through a staging copy elsewhere."""
    if dev.unified:
        buf = dev.acquire(array.nbytes, host=True)
        buf.write(array)
        return buf
    buf = dev.acquire(array.nbytes, host=False)
    staging = dev.acquire(array.nbytes, host=True)
    staging.write(array)
    try:
        Recording.once(dev, copies_in=[(staging, buf)])
    finally:
        dev.release(staging)
    return buf


class Holdings:
    """The buffers and pipelines one owner (a layer) holds on a device, released together. Kept apart from the
    owner, so that its finalizer (`released_with`) does not keep it alive, and so that a half-built owner gives
    back whatever it got."""

    def __init__(self, dev: Device):
        self.dev = dev
        self.buffers: list[Buffer] = []
        self.pipelines: list[Pipeline] = []

    def released_with(self, owner) -> weakref.finalize:
        """The finalizer that releases these holdings when `owner` is collected, or when called (close())."""
        return weakref.finalize(owner, self.dev.release_soon, self.release)

    def pipeline(self, name: str, spirv: bytes, constants: dict, kinds: tuple, push_bytes: int) -> Pipeline:
        found = self.dev.pipeline(name, spirv, constants, kinds, push_bytes)
        self.pipelines.append(found)
        return found

    def upload(self, array: np.ndarray) -> Buffer:
        buf = upload(self.dev, array)
        self.buffers.append(buf)
        return buf

    def release(self) -> None:
        for buf in self.buffers:
            self.dev.release(buf)
        for pipeline in self.pipelines:
            self.dev.release_pipeline(pipeline)
        self.buffers, self.pipelines = [], []


class VulkanBackend(Backend):
    name = "vulkan"
    family = "vulkan"

    def _enumerate(self) -> list[DeviceInfo]:
        try:
            found = physical_devices()
            return [DeviceInfo(self.name, i, *describe(p)) for i, p in enumerate(found)]
        except vk.VkError as exc:
            raise BackendUnavailable(f"vulkan: no usable driver ({type(exc).__name__})") from None


BACKEND = VulkanBackend()
